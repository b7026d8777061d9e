// The page of `genattr serve`: send a generated image to POST /attribute and show it beside
// its top-K training images, each drawn at the size the service suggests (side ~ sqrt of its
// influence, as in the authors' demo), with the influence left outside the top K.
"use strict";

const settings = JSON.parse(document.getElementById("settings").textContent);
const drop = document.getElementById("drop");
const fileInput = document.getElementById("file");
const topkInput = document.getElementById("topk");
const statusBox = document.getElementById("status");
const queryBox = document.getElementById("query");
const resultsBox = document.getElementById("results");
const remainingBox = document.getElementById("remaining");
const notesBox = document.getElementById("notes");
const servedBox = document.getElementById("served");
const examplesBox = document.getElementById("examples");
const truthBox = document.getElementById("truth");
let truth = new Set(); // gallery ids of the current example's true exemplars

topkInput.value = settings.defaultTopK;
topkInput.max = settings.maxTopK;

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  statusBox.textContent = text;
  statusBox.className = isError ? "error" : "";
}

function errorText(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg).join("; ");
  return `request failed (HTTP ${status})`;
}

function figure(r) {
  const side = r.display_side;
  const img = el("img", { src: r.thumbnail, alt: r.caption || r.id, width: side, height: side });
  const share = r.influence === null ? "" : `${r.influence.toFixed(2)} % · `;
  const label = `#${r.rank} · ${share}sim ${r.similarity.toFixed(3)}`;
  return el("figure", { className: truth.has(r.id) ? "hit true" : "hit" }, [
    img,
    el("figcaption", {}, [label, el("br"), r.caption || r.path || r.id]),
  ]);
}

function show(answer) {
  resultsBox.replaceChildren(...answer.results.map(figure));
  remainingBox.replaceChildren();
  if (answer.remaining !== null) {
    remainingBox.append(
      `Influence outside these ${answer.results.length} images: `,
      el("b", { textContent: `${answer.remaining.toFixed(2)} %` }),
    );
  }
  const notes = answer.notes.map((n) => el("p", { className: "note", textContent: n }));
  notesBox.replaceChildren(...notes);
  showTruth(answer);
  resultsBox.dataset.state = "done";
}

function showTruth(answer) {
  truthBox.replaceChildren();
  if (!truth.size) return;
  const found = answer.results.filter((r) => truth.has(r.id)).length;
  const pics = [...truth].map((id) =>
    el("img", { src: "/images/" + encodeURIComponent(id), alt: id, width: 64, height: 64 }));
  truthBox.append(
    el("p", {}, [el("b", { textContent: "True exemplars" }),
                 ` (outlined in green above where found: ${found} of ${truth.size} in the top ${answer.results.length}):`]),
    el("div", { className: "row" }, pics),
  );
}

function describe(about) {
  const head = about.head ? `${about.head} head` : "no head (raw features)";
  const cal = about.calibrator
    ? `calibrator inv_tau ${about.calibrator.inv_tau.toPrecision(3)}, bias ${about.calibrator.bias.toPrecision(3)}`
    : "no calibrator (similarities only)";
  servedBox.textContent = `Serving ${about.images} training images (${about.index_kind} index ` +
    `${about.index}), backbone ${about.backbone}, ${head}, ${cal}.`;
  if (!about.examples.length) return;
  examplesBox.append(el("span", { textContent: "Or try a test sample of the built-in world:" }));
  for (const ex of about.examples) {
    const button = el("button", { type: "button", title: ex.label },
                      [el("img", { src: ex.image, alt: ex.label })]);
    button.addEventListener("click", async () => {
      const blob = await (await fetch(ex.image)).blob();
      truth = new Set(ex.exemplar_ids);
      attribute(new File([blob], `${ex.label}.png`, { type: "image/png" }), true);
    });
    examplesBox.append(button);
  }
}

async function attribute(file, isExample = false) {
  if (!isExample) truth = new Set();
  truthBox.replaceChildren();
  if (file.size > settings.maxUploadBytes) {
    setStatus(`${file.name} is larger than the ${settings.maxUploadBytes} byte limit`, true);
    return;
  }
  const preview = el("img", { src: URL.createObjectURL(file), alt: "generated image" });
  queryBox.replaceChildren(
    el("figure", {}, [preview, el("figcaption", {}, [el("b", { textContent: "generated" }),
                                                     el("br"), file.name])]),
  );
  resultsBox.dataset.state = "loading";
  setStatus(`attributing ${file.name} …`);
  const form = new FormData();
  form.append("image", file);
  form.append("top_k", topkInput.value || settings.defaultTopK);
  let response, body;
  try {
    response = await fetch("/attribute", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    setStatus(`the service did not answer: ${err}`, true);
    resultsBox.dataset.state = "error";
    return;
  }
  if (!response.ok) {
    setStatus(errorText(body, response.status), true);
    resultsBox.replaceChildren();
    resultsBox.dataset.state = "error";
    return;
  }
  setStatus(`${body.query}: its top ${body.results.length} training images` +
            (body.estimated ? " (estimated: approximate index)" : ""));
  show(body);
}

fetch("/about").then((r) => r.json()).then(describe).catch(() => {});

fileInput.addEventListener("change", () => {
  if (fileInput.files.length) attribute(fileInput.files[0]);
});
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) attribute(e.dataTransfer.files[0]);
});

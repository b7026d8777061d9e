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
  return el("figure", { className: "hit" }, [
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
  resultsBox.dataset.state = "done";
}

async function attribute(file) {
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

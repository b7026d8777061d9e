"""The one layer that opens files and wires stages: the CLI, the service and the demo call
these, as Python users do. The stages below it (heads, search, calibrate, evaluate) take
in-memory objects and know no paths."""

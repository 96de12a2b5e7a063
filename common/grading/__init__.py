"""The grading harness: assignment manifests, isolated test runs, scores, reports, self-tests and releases.

How the pieces fit (each module has one job):

- `manifest`   reads `assignments/<name>/assignment.toml` and the mutants beside it;
- `solutions`  strips `# BEGIN SOLUTION` blocks into stubs and applies mutants;
- `intake`     reads a submission (folder or zip) and refuses anything that is not a declared file;
- `sandbox`    runs one command in a child process with time, memory, process and filesystem limits;
- `plugin`     the pytest plugin inside that child: it reports each test through a channel the harness owns;
- `harness`    grades one submission, task by task, in fresh work trees;
- `batch`      grades many submissions in parallel and assigns GPUs;
- `reports`    the terminal table, Gradescope `results.json` and the CSV gradebook;
- `selftest`   proves a grader: reference full marks, starter zero, every mutant caught;
- `release`    builds the student repository.
"""

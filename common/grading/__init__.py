"""The grading harness: assignment manifests, a trusted checker, a sandboxed worker, scores, reports, releases.

The trust boundary: hidden tests run in a trusted pytest process (`checker`) that never imports the
submission; the submission runs in an untrusted worker inside a bubblewrap sandbox (`sandbox`, `worker`); the
two exchange data only (`wire`), and every verdict is decided on the trusted side.

How the pieces fit (each module has one job):

- `manifest`   reads `assignments/<name>/assignment.toml` and the mutants beside it;
- `solutions`  strips `# BEGIN SOLUTION` blocks into stubs (or a bug hunt's starter text), plants bugs back,
               and applies mutants;
- `intake`     reads a submission (folder or zip) and refuses anything that is not a declared file;
- `harness`    grades one submission: a checker process per group of tasks, results into scores;
- `checker`    the pytest plugin of the trusted process: the `submission` fixture, verdicts to a report file;
- `client`     what the fixture offers hidden tests: calls into the worker that return data, exact types;
- `faults`     the submission's faults and the machine's, told apart by what the checker observes;
- `session`    one sandbox from the trusted side: start, fork workers, time and process limits, kill;
- `sandbox`    the bubblewrap command line (namespaces, read-only binds, empty environment);
- `worker`     the untrusted side: a template that has imported torch, forked into one worker per task;
- `wire`       the data-only format both sides speak (JSON and raw tensor bytes; nothing runs on load);
- `suites`     a command (a student's test suite, a pipeline) run once in a fresh sandbox on a tree the checker
               chose, judged by the exit status the checker observed (`launcher` applies its limits inside);
- `off_limits` refuses, in the worker, the course library's modules that a task asks students to write;
- `source_scan` what a submitted source names (read from its syntax tree, never run), for "write it yourself"
               rules;
- `ranks`      distributed code under test: N ranks in the worker, every collective carried out and logged
               by a hub the submission's code never runs in;
- `batch`      grades many submissions in parallel and assigns GPUs;
- `reports`    the terminal table, Gradescope `results.json` and the CSV gradebook;
- `public`     runs the public tests as students do (the self-test and the release use it);
- `selftest`   proves a grader: reference full marks, starter zero, every mutant caught;
- `release`    builds the student repository;
- `shard`      grading a batch on many machines and merging the gradebooks.
"""

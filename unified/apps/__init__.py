"""The applications, on top of every other layer (the composition roots, DESIGN §2): the `cola`
command line (cli.py, cli_tasks.py), the pipeline users load in one line (pipeline.py), the
OpenAI-compatible server (serve.py and its helpers) and the evaluation commands (diagnostics,
text world). Only these and demo/ may import tasks/ or demo/."""

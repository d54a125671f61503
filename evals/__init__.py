"""Math evaluation harness: `python evals/run.py --tasks math`. See evals/README.md."""

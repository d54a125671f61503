"""The study: train several arms of the trainer from one student, evaluate them with the harness, report."""

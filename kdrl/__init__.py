"""kdrl: the application layer on top of kdrl_kernels (model resolver, data, prompts, grading, generation,
trainer). See docs/DESIGN.md, section "kdrl/ shared pieces"."""

"""Time to accuracy from a cold start, sft_jax against a Hugging Face Trainer script (issue 27 item 3):
`python -m experiments.time_to_accuracy.run`."""

"""Log-sparsity vs BatchTopK Matryoshka trainers on real MiniLM activations."""

"""What one step of each algorithm computes, and how each stage is built from its config (`train_*`)."""

"""Review queues: which labels to check (out-of-fold probabilities ranked by cleanlab) and which
unlabelled images to label next (acquisition strategies), written for a person to work through."""

"""Searching and summarising many runs: Optuna studies (the sweeper's logic), the pruning
callback a trial reports to, and the sweep report written after every multirun."""

# The Optuna study of a search, in its sweep dir.
STUDY_FILE = "optuna.db"

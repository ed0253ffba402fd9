"""python label_issues.py <the training overrides> folds=5 (see conf/label_issues.yaml)."""

from thaw.cli import label_issues

if __name__ == "__main__":
    label_issues()

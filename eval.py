"""python eval.py ckpt_path=path/to/best.ckpt (see conf/eval.yaml)."""

from thaw.cli import evaluate

if __name__ == "__main__":
    evaluate()

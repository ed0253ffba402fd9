"""python fit_reject.py ckpt_path=path/to/best.ckpt (see conf/fit_reject.yaml)."""

from thaw.cli import fit_reject

if __name__ == "__main__":
    fit_reject()

"""python acquire.py ckpt_path=path/to/best.ckpt pool=unlabelled/ (see conf/acquire.yaml)."""

from thaw.cli import acquire

if __name__ == "__main__":
    acquire()

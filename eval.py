"""python eval.py ckpt_path=path/to/best.ckpt (see conf/eval.yaml)."""

from thaw.evaluate import main

if __name__ == "__main__":
    main()

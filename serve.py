"""python serve.py ckpt_path=path/to/best.ckpt (see conf/serve.yaml)."""

from thaw.serve import main

if __name__ == "__main__":
    main()

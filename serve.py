"""python serve.py ckpt_path=path/to/best.ckpt (see conf/serve.yaml)."""

from thaw.cli import serve

if __name__ == "__main__":
    serve()

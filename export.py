"""python export.py ckpt_path=path/to/best.ckpt format=onnx (see conf/export.yaml)."""

from thaw.cli import export

if __name__ == "__main__":
    export()

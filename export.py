"""python export.py ckpt_path=path/to/best.ckpt format=onnx (see conf/export.yaml)."""

from thaw.export import main

if __name__ == "__main__":
    main()

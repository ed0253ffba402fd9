"""python predict.py ckpt_path=path/to/best.ckpt inputs=photos/ (see conf/predict.yaml)."""

from thaw.cli import predict

if __name__ == "__main__":
    predict()

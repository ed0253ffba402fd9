"""python predict.py ckpt_path=path/to/best.ckpt inputs=photos/ (see conf/predict.yaml)."""

from thaw.predict import main

if __name__ == "__main__":
    main()

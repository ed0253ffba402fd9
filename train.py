"""python train.py model=resnet18 data=cifar10 (see conf/train.yaml, `python train.py --help`)."""

from thaw.train import main

if __name__ == "__main__":
    main()

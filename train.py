"""python train.py model=resnet18 data=cifar10 (see conf/train.yaml, `python train.py --help`)."""

from thaw.cli import train

if __name__ == "__main__":
    train()

"""python -m consistency.convert --source=S --checkpoint=PATH --config=configs/X.py --out=DIR."""

from consistency.experiment import cli, convert

if __name__ == "__main__":
    convert.define_flags()
    cli.run(convert.main)

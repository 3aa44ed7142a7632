"""python -m consistency.convert --source=S --checkpoint=PATH --config=configs/X.py --out=DIR."""

from absl import app

from consistency.experiment import convert

if __name__ == "__main__":
    convert.define_flags()
    app.run(convert.main)

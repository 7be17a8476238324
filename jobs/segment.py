"""Segment an image with free-text classes: `python jobs/segment.py image=<path or URL> classes="cat, dog, sky"`.

Writes `<output>/<stem>.png` (overlay with a legend, at the input's size), `<stem>.mask.png`,
`<stem>.json`, and with `save_features=true` the dense map `<stem>.features.npy`. Add
`checkpoint=<student.safetensors>` for the SPAR student, `features=sliding` for the teacher.
Keys: see `pipeline.evaluate.segment.SegmentConfig`.
"""
from __future__ import annotations

from pipeline.cli import print_json, run_job
from pipeline.evaluate.segment import SegmentConfig, run
from pipeline.codecs import BadImage


def main(argv: list[str] | None = None) -> dict:
    """Segment one image and print where the outputs went; exits non-zero on bad input."""
    return run_job(SegmentConfig, run, argv, expected=(BadImage, FileNotFoundError),
                   show=lambda summary: print_json({k: v for k, v in summary.items() if k != "config"}))


if __name__ == "__main__":
    main()

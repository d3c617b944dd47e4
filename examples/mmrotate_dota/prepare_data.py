"""Prepare DOTA v1.0 and check DOTA / DIOR-R against the expected image counts.

    python examples/mmrotate_dota/prepare_data.py split-dota \
        --dota data/DOTA --out data/split_ss_dota
    python examples/mmrotate_dota/prepare_data.py check \
        --dota data/split_ss_dota --dior data/DIOR

    python examples/mmrotate_dota/prepare_data.py dior-to-dota \
        --dior data/DIOR --out data/dior_r_dota

`split-dota` cuts DOTA v1.0's train and val images (with `labelTxt-v1.0` annotations)
into 1024x1024 patches with a 200-pixel overlap, using MMRotate's own split tool
(`tools/data/dota/split/img_split.py`, shipped inside the mmrotate package). DIOR-R needs
no preparation for the configs here (MMRotate's DIORDataset reads its oriented XML
directly); `dior-to-dota` writes its annotations in DOTA's text format instead (one
`x1 y1 ... x4 y4 class difficult` line per object, per split a folder of `.txt` files
plus a link to each image), for tools that only read DOTA's format, such as the
official DBF code or `DOTADataset`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

#: What a correct preparation contains (images, or patches for split DOTA).
EXPECTED = {
    ("dota", "train"): 15749,  # patches from 1,411 images
    ("dota", "val"): 5297,  # patches from 458 images
    ("dior", "train"): 5862,
    ("dior", "val"): 5863,
}


def split_dota(dota: str, out: str, nproc: int) -> None:
    import mmrotate

    tool = os.path.join(os.path.dirname(mmrotate.__file__), ".mim", "tools", "data", "dota",
                        "split", "img_split.py")  # fmt: skip
    for split in ("train", "val"):
        subprocess.run([
            sys.executable, tool, "--nproc", str(nproc),
            "--img-dirs", os.path.join(dota, split, "images"),
            "--ann-dirs", os.path.join(dota, split, "labelTxt-v1.0", "labelTxt"),
            "--sizes", "1024", "--gaps", "200", "--rates", "1.0",
            "--save-dir", os.path.join(out, split), "--save-ext", ".png",
        ], check=True)  # fmt: skip


def dior_to_dota(dior: str, out: str) -> dict[str, int]:
    """Convert DIOR-R's oriented XML annotations into DOTA text files; objects per split."""
    import xml.etree.ElementTree as ET

    corners = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
               "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")  # fmt: skip
    xml_dir = os.path.join(dior, "Annotations", "Oriented Bounding Boxes")
    written = {}
    for split in ("train", "val"):
        with open(os.path.join(dior, "ImageSets", "Main", f"{split}.txt")) as f:
            ids = [line.strip() for line in f if line.strip()]
        os.makedirs(os.path.join(out, split, "annfiles"), exist_ok=True)
        os.makedirs(os.path.join(out, split, "images"), exist_ok=True)
        objects = 0
        for image_id in ids:
            root = ET.parse(os.path.join(xml_dir, f"{image_id}.xml")).getroot()
            lines = []
            for obj in root.iter("object"):
                box = obj.find("robndbox")
                if box is None:
                    continue
                coords = " ".join(f"{float(box.find(c).text):.1f}" for c in corners)
                difficult = obj.find("difficult")
                flag = 0 if difficult is None else int(difficult.text or 0)
                lines.append(f"{coords} {obj.find('name').text.strip().lower()} {flag}")
            objects += len(lines)
            with open(os.path.join(out, split, "annfiles", f"{image_id}.txt"), "w") as f:
                f.write("".join(line + "\n" for line in lines))
            image = os.path.abspath(os.path.join(dior, "JPEGImages-trainval", f"{image_id}.jpg"))
            link = os.path.join(out, split, "images", f"{image_id}.jpg")
            if not os.path.lexists(link):
                os.symlink(image, link)
        written[split] = objects
    return written


def count(dota: str | None, dior: str | None) -> dict[tuple[str, str], int]:
    found = {}
    for split in ("train", "val"):
        if dota:
            folder = os.path.join(dota, split, "annfiles")
            found["dota", split] = len(os.listdir(folder)) if os.path.isdir(folder) else 0
        if dior:
            listing = os.path.join(dior, "ImageSets", "Main", f"{split}.txt")
            with open(listing) if os.path.exists(listing) else open(os.devnull) as f:
                found["dior", split] = sum(1 for line in f if line.strip())
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split-dota")
    split.add_argument("--dota", required=True, help="DOTA v1.0 root with train/ and val/")
    split.add_argument("--out", default="data/split_ss_dota")
    split.add_argument("--nproc", type=int, default=8)
    convert = sub.add_parser("dior-to-dota")
    convert.add_argument("--dior", required=True, help="the DIOR root (data/DIOR)")
    convert.add_argument("--out", default="data/dior_r_dota")
    check = sub.add_parser("check")
    check.add_argument("--dota", help="the split DOTA root (data/split_ss_dota)")
    check.add_argument("--dior", help="the DIOR root (data/DIOR)")
    args = parser.parse_args(argv)
    if args.command == "split-dota":
        split_dota(args.dota, args.out, args.nproc)
        return 0
    if args.command == "dior-to-dota":
        for split, n in dior_to_dota(args.dior, args.out).items():
            print(f"{split}: {n} objects written to {os.path.join(args.out, split)}")
        return 0
    ok = True
    for key, n in count(args.dota, args.dior).items():
        status = "ok" if n == EXPECTED[key] else f"EXPECTED {EXPECTED[key]}"
        ok &= n == EXPECTED[key]
        print(f"{key[0]:>5} {key[1]:>5}: {n:>6} {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

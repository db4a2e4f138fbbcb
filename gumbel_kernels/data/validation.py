"""Start-up checks of the data a run will read, so that a broken data set fails before training
rather than hours into it (or, for the val set, after it):

- `check_has_annotations`: a training set with no annotation at all (a wrong file);
- `check_same_categories`: train and val must have the same category ids (the classifier's
  classes are the training set's; evaluation maps them back by position);
- `check_evaluation_fields`: what LVIS evaluation reads from the val json (`frequency` of every
  category, `neg_category_ids` / `not_exhaustive_category_ids` of every image);
- `check_image_files`: every image exists, opens and has the json's width and height (a header
  read: PIL's lazy open decodes no pixels), with a progress bar;
- `rle_problem`: whether an RLE segmentation's run lengths add up to its image (LVISDataset's
  json validation calls it for every RLE).
Every error names the file and the offending record.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, NamedTuple, Optional, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

__all__ = ["ImageEntry", "dataset_image_entries", "check_image_files", "check_has_annotations",
           "check_same_categories", "check_evaluation_fields", "rle_problem"]

_SHOWN = 3  # problems quoted in a message; the rest are counted


class ImageEntry(NamedTuple):
    image_id: int
    path: str
    width: int
    height: int


def _summary(problems: List[str], total: int, what: str) -> str:
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return f"{len(problems)} of {total} {what}: " + "; ".join(problems[:_SHOWN]) + more


# ------------------------------------------------------------------------------ images --

def dataset_image_entries(dataset) -> List[ImageEntry]:
    """(image id, path, width, height) of every item of an LVISDataset. Its image paths are
    resolved first (LVISDataset.check_image_files: FileNotFoundError naming the json, the first
    missing image id, the paths tried and how many are missing)."""
    dataset.check_image_files()
    entries = []
    for i in range(len(dataset)):
        info = dataset.image_info(i)
        entries.append(ImageEntry(int(info["id"]), dataset.image_path(i), int(info["width"]),
                                  int(info["height"])))
    return entries


def _image_problem(entry: ImageEntry) -> Optional[str]:
    try:
        with Image.open(entry.path) as image:  # reads the header only
            width, height = image.size
    except FileNotFoundError:
        return f"image id {entry.image_id}: {entry.path} does not exist"
    except (UnidentifiedImageError, OSError) as error:
        return f"image id {entry.image_id}: {entry.path} is not a readable image ({error})"
    if (width, height) != (entry.width, entry.height):
        return (f"image id {entry.image_id}: {entry.path} is {width}x{height} (width x height) "
                f"but the json says {entry.width}x{entry.height}")
    return None


def _chunk_problems(chunk: Sequence[ImageEntry]) -> List[str]:
    return [p for p in map(_image_problem, chunk) if p is not None]


def check_image_files(entries: Sequence[ImageEntry], source: str, *, progress: bool = True,
                      threads: int = 8, chunk: int = 256) -> None:
    """Every image exists, opens as an image and has the expected width and height.

    `source` (the json) starts the error message; `threads` overlap the file-system latency of
    the header reads (which matters on network file systems). ValueError if any image fails."""
    chunks = [entries[k:k + chunk] for k in range(0, len(entries), chunk)]
    problems: List[str] = []
    with tqdm(total=len(entries), desc=f"checking images of {os.path.basename(source)}",
              unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar, \
            ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for part, found in zip(chunks, pool.map(_chunk_problems, chunks)):
            problems += found
            bar.update(len(part))
    if problems:
        raise ValueError(f"{source}: " + _summary(problems, len(entries), "images fail the check"))


# ------------------------------------------------------------------------- annotations --

def check_has_annotations(dataset) -> None:
    """A training set needs at least one annotation."""
    if not any(dataset.image_class_indices(i) for i in range(len(dataset))):
        raise ValueError(f"{dataset.ann_file}: the training set has no annotations "
                         f"({len(dataset)} images, 0 instances): is this the right file?")


def check_same_categories(train, val) -> None:
    """Train and val datasets must have the same category ids."""
    train_ids, val_ids = set(train.cat_ids), set(val.cat_ids)
    if train_ids != val_ids:
        only_train, only_val = sorted(train_ids - val_ids), sorted(val_ids - train_ids)
        raise ValueError(
            f"the train json {train.ann_file} has {len(train_ids)} categories and the val json "
            f"{val.ann_file} {len(val_ids)}; they must be the same: ids only in train "
            f"{only_train[:10]}{' ...' if len(only_train) > 10 else ''}, only in val "
            f"{only_val[:10]}{' ...' if len(only_val) > 10 else ''}")


def check_evaluation_fields(dataset) -> None:
    """The fields LVIS evaluation reads: every category's `frequency` (for APr/APc/APf) and
    every image's `neg_category_ids` and `not_exhaustive_category_ids` (federated ground truth).
    The json validation of LVISDataset has checked their types where present."""
    problems = [f"categories[id={c['id']}] has no 'frequency'"
                for c in dataset.categories if "frequency" not in c]
    if problems:
        raise ValueError(f"{dataset.ann_file}: "
                         + _summary(problems, len(dataset.categories),
                                    "categories lack a field LVIS evaluation needs ('r', 'c' or "
                                    "'f', for APr/APc/APf)"))
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):
        problems = [f"images[id={im['id']}]" for im in dataset.images if key not in im]
        if problems:
            raise ValueError(f"{dataset.ann_file}: "
                             + _summary(problems, len(dataset.images),
                                        f"images have no '{key}' (LVIS evaluation needs it; an "
                                        f"empty list is fine)"))


def _compressed_counts(text: str) -> List[int]:
    """Run lengths of a COCO compressed RLE string: 5 bits per character (offset 48) with a
    continuation bit, sign-extended, and from the fourth run on a delta to the run two back."""
    counts: List[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("ends inside a run length")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"has the character {text[position]!r} at {position}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_problem(segmentation: dict) -> Optional[str]:
    """What is wrong with an RLE segmentation ({"size": [h, w], "counts": str or list}), or
    None: its run lengths must be non-negative integers adding up to h * w."""
    height, width = segmentation["size"]
    counts = segmentation["counts"]
    if isinstance(counts, str):
        try:
            counts = _compressed_counts(counts)
        except ValueError as error:
            return f"is not a valid compressed RLE string (it {error})"
    elif not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return "must be a list of integers"
    if any(c < 0 for c in counts):
        return "has a negative run length"
    if sum(counts) != height * width:
        return (f"has run lengths adding up to {sum(counts)} pixels, not height x width = "
                f"{height} x {width} = {height * width}")
    return None

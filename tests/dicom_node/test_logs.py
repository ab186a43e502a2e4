"""UIDs in logs: the node and the workers name one UID by the same hash, so one grep follows an instance."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.logs import uid_hash
from inference.errors import PoisonInputError
from inference.pixels import load_image


def test_node_and_worker_hash_a_uid_identically() -> None:
    """A worker's error about an image names it by the hash the node's intake and export logs use."""
    sop_uid = generate_uid()
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid  # no PixelData: the worker refuses the image and names it
    with pytest.raises(PoisonInputError) as refused:
        load_image(ds)
    assert f"image {uid_hash(sop_uid)} " in str(refused.value)
    assert len(uid_hash(sop_uid)) == 12
    assert sop_uid not in str(refused.value)

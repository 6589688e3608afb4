"""The synthetic testbed: scenes, items of four task families, datasets on disk, exports.

Chapter 1 of the book. `make_item` draws one item (a pure function of seed, split, family and
index); `dataset.ensure` writes and reuses a dataset folder; `exports` writes the testbed in
the published formats of Monet-SFT, CapImagine-style SFT data and HR-Bench.
"""

from .items import (
                    FACT_KEYS,
                    FAMILIES,
                    LETTERS,
                    NUMBER_WORDS,
                    RELATIONS,
                    SPLITS,
                    VOCABULARY,
                    Item,
                    TestbedConfig,
                    cell_labels,
                    crop_box,
                    evidence_fraction,
                    item_keys,
                    items_frame,
                    make_item,
                    make_scene,
                    relation,
)

__all__ = ["FACT_KEYS", "FAMILIES", "LETTERS", "NUMBER_WORDS", "RELATIONS", "SPLITS", "VOCABULARY", "Item",
           "TestbedConfig", "cell_labels", "crop_box", "evidence_fraction", "item_keys", "items_frame", "make_item",
           "make_scene", "relation"]

"""Built-in datasets (MNIST-1D, generated locally), Ray Data helpers and teacher-output caches."""

from raydistill.data.mnist1d import NUM_CLASSES, SplitData, load_mnist1d, load_transfer_set
from raydistill.data.ray_data import (arrays_to_table, table_to_arrays, to_ray_dataset, val_test_columns,
                                     val_test_dataset)
from raydistill.data.topk_cache import read_teacher_outputs

__all__ = ["NUM_CLASSES", "SplitData", "arrays_to_table", "load_mnist1d", "load_transfer_set",
           "read_teacher_outputs", "table_to_arrays", "to_ray_dataset",
           "val_test_columns", "val_test_dataset"]

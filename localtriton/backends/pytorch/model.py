"""A Python implementation of Triton's `pytorch` (libtorch) backend, for Triton builds without it.

Installed as `<backend-dir>/pytorch/model.py`, it serves an unchanged `platform: "pytorch_libtorch"`
model: it `torch.jit.load`s `<model>/<version>/model.pt`, feeds the inputs in config order (the
forward() argument order, as libtorch names them), concatenates the dynamic batch, runs it once
and splits the outputs, mapped by the `<name>__<index>` convention.
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


def _output_index(name):
    head, sep, index = name.rpartition("__")
    return int(index) if sep and index.isdigit() else 0


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [entry["name"] for entry in config["input"]]
        self.outputs = [(entry["name"], _output_index(entry["name"])) for entry in config["output"]]
        torch.set_num_threads(int(os.environ.get("LOCALTRITON_TORCH_THREADS", "1")))
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.model = torch.jit.load(path, map_location="cpu").eval()

    def execute(self, requests):
        per_input = [
            [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.input_names
        ]
        sizes = [array.shape[0] for array in per_input[0]]
        batch = [torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays))) for arrays in per_input]
        with torch.inference_mode():
            result = self.model(*batch)
        results = result if isinstance(result, (tuple, list)) else (result,)
        arrays = [results[index].numpy() for _, index in self.outputs]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, array[start : start + size]) for (name, _), array in zip(self.outputs, arrays)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

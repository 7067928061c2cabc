"""Run by `accelerate launch` from test_distributed.py: train, then save this rank's weights."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from loomlens.config import TrainConfig, load_config
from loomlens.train.recipe import train

data, model, out, weights = sys.argv[1:5]
cfg = load_config(TrainConfig, overrides={
    "data": data, "model": model, "out": out, "max_steps": "2", "batch_size": "2", "eval_every": "1",
    "eval_max_images": "0", "progress": "false", "lr": "0.01", "lora.r": "4",
    "lora.dropout": "0.0",  # plain LoRA: the layers run in their folded form (model/folded_lora.py)
})
result = train(cfg)
rank = PartialState().process_index
state = {k: v.detach().cpu() for k, v in result.model.named_parameters() if "lora_" in k}
torch.save(state, Path(weights) / f"rank{rank}.pt")

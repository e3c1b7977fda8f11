"""DeepSpeed ZeRO-3: the partition-aware fused update, distributed training and gathered saving."""

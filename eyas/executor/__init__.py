"""The Ray executor: the target's tensor-parallel shards and the drafter as Ray actors, driven by a
coordinator (ClusterEngine) over gRPC streams, with tensors over torch.distributed."""

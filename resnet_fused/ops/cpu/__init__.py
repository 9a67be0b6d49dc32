"""The `cpu` backend's inference path for conv+BN module pairs (docs/design.md §3.1).

* `onednn`: the weight cache — BN folded into the weights, packed for oneDNN
  or transformed for the Winograd kernel — and the one-call convolutions on it;
* `modules`: the module-level op the `cpu` backend registers
  (`conv_bn_act_module`: a conv and its norm module in, one call out, or None
  where the path does not apply) and the stem's max-pool.

FusedResNet's planned path over whole stages (`resnet_fused.plan`) runs the
same packed convolutions back to back.
"""

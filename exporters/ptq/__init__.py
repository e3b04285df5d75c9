"""Post-training quantization beyond round-to-nearest: float work at export time only.

The walker (`exporters.quantize`) asks `plan.Ptq.linear` for each linear layer's integer input
and quantized weights; what comes back is integers and scales like any other export, so
the integer graph and the fake-quant record need nothing new. The techniques, each an
option of `refsim export` (`ExportOptions`), each in its own module:

| option | module | what it changes |
|---|---|---|
| `--smooth` | `smoothing` | per-channel factors folded into the input requantization and the weight rows (SmoothQuant), alpha chosen per input |
| `--gptq` | `gptq` | which grid point each weight rounds to, from the calibration Hessian X^T X |
| `--bias-correction` | `bias_correction` | the quantized bias absorbs the mean output shift of the quantized layer |
| `--calib-method entropy` | `entropy` | KL-divergence clip of every activation |
| `--calib-method auto` | `clipping` | per linear-layer input, the clip whose layer output error is smallest |

All of them read what `calibrate` observed of each linear layer's input (`InputStats`:
per-channel ranges and means, X^T X, and a sample of rows).
"""


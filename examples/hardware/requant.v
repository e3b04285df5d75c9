// refsim's Requant op (docs/OPS.md) with rounding="half_up", one element per evaluation:
//
//     out = clip(round_shift(acc*mul + bias, shift, half_up) + offset, lo, hi)
//     round_shift(v, s, half_up) = floor((v + 2^(s-1)) / 2^s), and v itself for s = 0
//
// Combinational, exact in 64 bits (acc and mul up to 32 bits, bias up to 32 bits).
module requant (
  input  wire signed [31:0] acc,
  input  wire signed [31:0] mul,
  input  wire signed [31:0] bias,
  input  wire        [5:0]  shift,
  input  wire signed [7:0]  offset,
  input  wire signed [7:0]  lo,
  input  wire signed [7:0]  hi,
  output reg  signed [7:0]  out
);
  reg signed [63:0] product, rounded, total;

  always @* begin
    product = $signed({{32{acc[31]}}, acc}) * $signed({{32{mul[31]}}, mul}) + $signed({{32{bias[31]}}, bias});
`ifdef TRUNCATE  // a deliberately wrong design, to see the test fail: rounds down
    rounded = product;
`else
    rounded = (shift == 6'd0) ? product : product + (64'sd1 <<< (shift - 6'd1));
`endif
    total = (rounded >>> shift) + $signed({{56{offset[7]}}, offset});
    if (total > $signed({{56{hi[7]}}, hi}))
      out = hi;
    else if (total < $signed({{56{lo[7]}}, lo}))
      out = lo;
    else
      out = total[7:0];
  end
endmodule

"""experiments/mask_agreement.py: dense and structured masks agree in both Pallas kernels (interpret mode)."""

from experiments import mask_agreement


def test_dense_and_structured_masks_agree_with_each_other_and_the_oracle():
  rows = mask_agreement.run(mask_agreement.MaskAgreementConfig(batch=2, seq_len=40, heads=2, kv_heads=1, head_dim=16,
                                                               padding=0.25, implementations=("pallas", "pallas_tpu")))
  assert [r["kernel"] for r in rows] == ["pallas", "pallas_tpu"]
  for r in rows:
    assert r["out_diff"] < 1e-5 and r["grad_diff"] < 1e-4, r
    assert r["dense_oracle"] < 1e-5 and r["structured_oracle"] < 1e-5, r

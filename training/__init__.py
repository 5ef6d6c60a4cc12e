"""Training action recognizers on the anonymized dataset: non-private, DP-SGD and MaskDP
(../shared/design/MASKDP.md), with Opacus' accountants."""

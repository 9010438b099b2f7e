"""``python -m ismctl.losses``: the wavelet loss's per-band weights (weight per unit of squared
error, plain MSE = 1) on a prepared data set or on synthetic latent-like data; see
``ismctl/losses/band_stats.py``."""

import argparse

from ismctl.losses.band_stats import print_band_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ismctl.losses",
                                     description="Per-band weights of the wavelet loss "
                                     "(weight per unit of squared error, MSE = 1).")
    parser.add_argument("--data", help="prepared data folder (default: synthetic latent-like)")
    parser.add_argument("--wavelet", default="haar")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--max-ratio", type=float, default=10.0)
    parser.add_argument("--mean-spread", type=float, default=0.0,
                        help="sd of each synthetic sample's channel-mean shift")
    args = parser.parse_args(argv)
    print_band_weights(args.data, args.wavelet, args.levels, args.samples, args.max_ratio,
                       args.mean_spread)


# Importing the module (the layer test imports every module) must not parse the importer's
# command line.
if __name__ == "__main__":
    main()

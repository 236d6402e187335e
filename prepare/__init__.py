"""Dataset preparation: turn a download or files a user already has into train.csv and test.csv.

One module per dataset holds all knowledge of that dataset (`cars`, `aircraft`, `cub`);
`fetch` downloads and unpacks, `tables` checks images and writes the CSVs."""
from . import aircraft, cars, cub

DATASETS = {"cars": cars, "aircraft": aircraft, "cub": cub}

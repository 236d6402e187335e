"""Dataset preparation: turn a download or files a user already has into train.csv and test.csv.

One module per dataset holds all knowledge of that dataset (`cars`, `aircraft`, `cub`; `folders` for a user's own class folders);
`fetch` downloads and unpacks, `tables` checks images and writes the CSVs."""
from . import aircraft, cars, cub, folders

DATASETS = {"cars": cars, "aircraft": aircraft, "cub": cub, "folders": folders}

#pragma once
// Uneven data parallelism: a step's rows (sequences) split over ranks of different speeds. The
// model is linear: rank r needs rows_r * sec_per_row[r] seconds, and a step lasts as long as its
// slowest rank. Pure functions, the same result on every rank for the same input.
#include <cstdint>
#include <string>
#include <vector>

namespace mxn {

// Rows per rank summing to `rows`, each at least 1, that minimise the slowest rank's time.
// Ties go to the lower rank, so equal costs give the even split (first rows % n ranks one more).
std::vector<int64_t> split_rows(int64_t rows, const std::vector<double>& sec_per_row);

// The slowest rank's predicted seconds for a split.
double slowest_seconds(const std::vector<int64_t>& split, const std::vector<double>& sec_per_row);

// `split` as the user gives it: "auto" (measure, then follow drift), "even", or one positive
// weight per rank ("3,1"). Returns seconds-per-row stand-ins for split_rows (1/weight), or an
// empty vector for "auto". An Error names what was wrong.
std::vector<double> parse_split(const std::string& split, int ranks);

// When to move rows between ranks: the split that the latest per-row times call for, if it
// would shorten the predicted step by more than `gain` (a fraction), else `current`.
std::vector<int64_t> rebalance(const std::vector<int64_t>& current,
                               const std::vector<double>& sec_per_row, double gain);

// ZeRO-1: the optimizer state's n floats over ranks in proportion to `weights` (each rank's free
// memory), as world + 1 offsets; each share a multiple of `align` floats but the last.
std::vector<int64_t> shard_bounds(int64_t n, const std::vector<double>& weights, int64_t align);

}  // namespace mxn

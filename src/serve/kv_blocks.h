#pragma once
// The serving engine's paged KV cache, as blocks of `block` rows of one device buffer. A request
// holds a list of blocks (its block table); a block that holds a whole block of some prompt's
// tokens is published under the hash of the prompt up to and including it, so a later request
// with the same prompt prefix (a system prompt, a few-shot preamble) takes those blocks instead
// of computing them again (vLLM's automatic prefix caching). Unreferenced published blocks stay
// cached until a block is needed and none is free; then the least recently used goes.
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace mxn {

class KvBlocks {
 public:
  KvBlocks(int64_t blocks, int64_t block);

  int64_t block() const { return block_; }
  int64_t total() const { return int64_t(blocks_.size()); }
  int64_t used() const { return used_; }      // referenced by a running request
  int64_t cached() const { return cached_; }  // a published prefix, unreferenced: reusable
  int64_t free() const { return total() - used_ - cached_; }
  int64_t available() const { return total() - used_; }  // free, or cached and evictable

  // The cached blocks that hold prompt[0, k * block) for the largest k <= most, in order; each
  // now referenced by the caller. Nothing is taken when `take` is false (a dry run). `salt`
  // tells apart caches of the same tokens that differ (the LoRA adapter that computed them).
  std::vector<int32_t> match(const std::vector<int32_t>& prompt, int64_t most, bool take = true,
                             uint64_t salt = 0);
  int32_t take();  // a block for new rows (evicting the least recently used cached one); -1: none
  void hold(int32_t blk);  // one more reference to a referenced block (an adapter's prefix)
  // Block `blk` (referenced) now holds tokens [i * block, (i + 1) * block) of `prompt`, whose
  // earlier blocks are `table`[0, i): later requests may share it.
  void publish(const std::vector<int32_t>& table, int64_t i, const std::vector<int32_t>& prompt,
               uint64_t salt = 0);
  void release(int32_t blk);  // the caller's reference ends

 private:
  struct Block {
    int32_t refs = 0;
    bool published = false;
    uint64_t key = 0, stamp = 0;  // the prefix hash; when it was last released
    int32_t parent = -1;          // the block before it in the prefix it holds
    std::vector<int32_t> tokens;  // the block's tokens, to check a hash match exactly
  };
  uint64_t key_of(uint64_t parent_key, const int32_t* tokens) const;
  void unpublish(int32_t blk);

  int64_t block_, used_ = 0, cached_ = 0;
  uint64_t clock_ = 0;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;  // unreferenced, unpublished
  std::unordered_map<uint64_t, int32_t> by_key_;
};

}  // namespace mxn

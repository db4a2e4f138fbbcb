// The emulated launch (see runtime.h): blockDim OS threads walk the grid's blocks in order.
//
// Two barriers per launch: `threads_of_block` is __syncthreads for the current block (a thread
// that finishes the kernel body drops out of it, so the others' barriers still complete), and
// `between_blocks` holds every thread until the whole block is done; its completion step sets
// up the next block's barrier. Both are std::barrier, whose acquire/release atomics give
// ThreadSanitizer the happens-before edges of a real __syncthreads and nothing more: a missing
// barrier in device code is a data race that TSan reports.
#include "runtime.h"

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace gk {
namespace emu {
namespace {

using Barrier = std::barrier<>;

struct BlockBarrierSlot {
  std::optional<Barrier> barrier;
};

// The current block's barrier of the calling emulated thread (null outside a launch).
thread_local BlockBarrierSlot* current_block = nullptr;

std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

struct RenewBlockBarrier {
  BlockBarrierSlot* slot;
  std::ptrdiff_t threads;
  void operator()() noexcept { slot->barrier.emplace(threads); }
};

}  // namespace

void sync_block_threads() {
  if (current_block == nullptr) {
    std::fprintf(stderr, "__syncthreads() called outside an emulated kernel launch\n");
    std::abort();
  }
  current_block->barrier->arrive_and_wait();
}

void run_grid(dim3 grid, dim3 block, size_t /*shared_bytes*/,
              const std::function<void()>& body) {
  const unsigned long long threads =
      static_cast<unsigned long long>(block.x) * block.y * block.z;
  const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  if (threads == 0 || blocks == 0 || threads > 1024 || block.z > 64) {
    throw std::invalid_argument(
        "emulated CUDA launch: invalid configuration argument (grid " + std::to_string(grid.x) +
        "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " +
        std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z) +
        ")");
  }
  const std::lock_guard<std::mutex> lock(launch_mutex());
  BlockBarrierSlot slot;
  slot.barrier.emplace(static_cast<std::ptrdiff_t>(threads));
  std::barrier<RenewBlockBarrier> between_blocks(
      static_cast<std::ptrdiff_t>(threads),
      RenewBlockBarrier{&slot, static_cast<std::ptrdiff_t>(threads)});

  auto thread_main = [&](unsigned long long linear_thread) {
    current_block = &slot;
    threadIdx = uint3{static_cast<unsigned>(linear_thread % block.x),
                      static_cast<unsigned>(linear_thread / block.x % block.y),
                      static_cast<unsigned>(linear_thread / (block.x * block.y))};
    blockDim = block;
    gridDim = grid;
    for (unsigned long long b = 0; b < blocks; ++b) {
      blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                       static_cast<unsigned>(b / (static_cast<unsigned long long>(grid.x) * grid.y))};
      body();
      slot.barrier->arrive_and_drop();  // returned from the kernel: arrived at every barrier
      between_blocks.arrive_and_wait();
    }
    current_block = nullptr;
  };

  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned long long t = 0; t < threads; ++t) workers.emplace_back(thread_main, t);
  for (std::thread& worker : workers) worker.join();
}

}  // namespace emu
}  // namespace gk

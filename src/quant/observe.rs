//! Observers: streaming statistics of one tensor's values, turned into a range to quantize.
//! (Being written: see the module contract in the task.)

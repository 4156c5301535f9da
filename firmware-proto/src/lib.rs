#![cfg_attr(not(feature = "std"), no_std)]
//! placeholder: being written

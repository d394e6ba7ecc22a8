"""Reference training setups that ps is compared against (same model, data and optimizer)."""

"""The scheduled actions, one module per family (backup, power, snapshot, restore), and the registry of
them (``scheduler.actions.registry``). Importing the package imports none of them."""

"""What a run leaves and what users look at: the run folder and its files (``run_folder``, the one
owner of their names and formats), grids, curves and metrics (``report``), images from a run
(``generation``: ``sample``), base against fine-tune (``evaluate``: ``eval`` and the held-out
figures), and the before/after page (``preview``)."""

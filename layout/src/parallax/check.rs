//! [`ParallaxCheck`], the store check's [`LayoutCheck`](dovetail_store::check::LayoutCheck)
//! for parallax versions.

use super::*;

impl ParallaxCheck {
    pub const V1: ParallaxCheck = ParallaxCheck {
        layout: "parallax-v1",
        data: false,
    };
    pub const V2: ParallaxCheck = ParallaxCheck {
        layout: "parallax-v2",
        data: false,
    };
    /// parallax-v2, verifying every data block's checksum too (`store check --data`).
    pub const V2_DATA: ParallaxCheck = ParallaxCheck {
        layout: "parallax-v2",
        data: true,
    };
    /// The checks of every parallax layout.
    pub const ALL: [&'static dyn dovetail_store::check::LayoutCheck; 2] =
        [&ParallaxCheck::V1, &ParallaxCheck::V2];
    /// [`ALL`](ParallaxCheck::ALL), with every parallax-v2 data block verified against its
    /// checksum (parallax-v1 keeps none: its data cannot be verified).
    pub const ALL_DATA: [&'static dyn dovetail_store::check::LayoutCheck; 2] =
        [&ParallaxCheck::V1, &ParallaxCheck::V2_DATA];
}

impl dovetail_store::check::LayoutCheck for ParallaxCheck {
    fn layout(&self) -> &str {
        self.layout
    }

    fn check(
        &self,
        version: &dovetail_store::VersionInfo,
        space: Arc<dyn VersionSpace>,
    ) -> Vec<String> {
        if version.root_len == 0 {
            // Created but never served: no tree yet.
            return Vec::new();
        }
        let opts = ParallaxOptions {
            persist_every: None,
            ..ParallaxOptions::default()
        };
        match Parallax::open_with(space, opts) {
            Ok(layout) if layout.layout() != self.layout => vec![format!(
                "the catalog says {}, its root record is of {}",
                self.layout,
                layout.layout()
            )],
            Ok(layout) => {
                let mut problems = layout.check();
                if self.data {
                    problems.extend(layout.check_data());
                }
                problems
            }
            Err(e) => vec![format!("cannot open: {}", crate::error_chain(&e))],
        }
    }

    fn shared_refs(
        &self,
        version: &dovetail_store::VersionInfo,
        space: Arc<dyn VersionSpace>,
    ) -> std::result::Result<Option<Vec<dovetail_store::SharedRef>>, String> {
        if version.root_len == 0 {
            return Ok(Some(Vec::new()));
        }
        let opts = ParallaxOptions {
            persist_every: None,
            ..ParallaxOptions::default()
        };
        let layout = Parallax::open_with(space, opts).map_err(|e| crate::error_chain(&e))?;
        layout
            .shared_refs()
            .map(Some)
            .map_err(|e| crate::error_chain(&e))
    }
}
